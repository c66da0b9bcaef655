"""A plugin module that fails on import, as a plugin with a missing dependency would."""

raise ImportError("fusion-plugin-example's broken entry point: this plugin needs the package 'nonexistent-dependency'")
