"""The built-in plugins. Each is an ordinary plugin module written against the public API only."""

BUILTINS = (
    "fusion.default_plugins.local_resolver",
    "fusion.default_plugins.architectures",
    "fusion.default_plugins.linear",
    "fusion.default_plugins.task_arithmetic",
)
