"""The built-in plugins: ordinary plugin modules written against the public contract
(``fusion`` / ``fusion.api``) only, exactly as a third-party plugin would be. The host loads them
from the list in ``fusion/host.py``."""
