import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """The folder of tiny stand-in models (tests/recipe_models.py) for the session, shared by
    the test processes: each stand-in is built once, on first use."""
    return tmp_path_factory.getbasetemp().parent / "recipe-standins"
