"""The built-in plugins, one module (or subpackage) each; the host loads them by name."""
