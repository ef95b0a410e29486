"""Experiment configuration: the pydantic schema (``schema``), YAML loading with ``base:`` and ``--set``
(``loading``), the name -> factory registries of components (``registry``) and the protocol rules a config must
follow (``protocol``). ``load_config``, ``config_to_yaml`` and ``ConfigError`` are importable from here."""

from medseg_lightning.config.loading import ConfigError, config_to_yaml, load_config

__all__ = ["ConfigError", "config_to_yaml", "load_config"]
