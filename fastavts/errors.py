"""The error a user can act on: a setting, a combination of settings or an input that fastavts
refuses, with a message that says what was wrong and what to do. Every command ends with exit
code 2 and that one line (fastavts/cli.py). Here, below every other module, so any module can
raise it without importing the config machinery."""


class ConfigError(ValueError):
    """A config value or combination of values that fastavts refuses (message says which)."""
