"""The built-in plugins. Each is an ordinary plugin module written against the public API only."""

BUILTINS = (
    "fusion.default_plugins.local_resolver",
    "fusion.default_plugins.hub_resolver",
    "fusion.default_plugins.architectures",
    "fusion.default_plugins.linear",
    "fusion.default_plugins.task_arithmetic",
    "fusion.default_plugins.ties",
    "fusion.default_plugins.sce",
    "fusion.default_plugins.varm",
    "fusion.default_plugins.alignments",
    "fusion.default_plugins.fusion_functions",
)
