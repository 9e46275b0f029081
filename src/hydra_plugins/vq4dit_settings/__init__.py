"""Hydra finds this plugin by itself (the `hydra_plugins` namespace) whenever it composes a config: before each
composition it registers the class defaults of every settings group found on the search path
(vq4dit/cli/settings_configs.py), so `hydra.main`, `hydra.compose` and a `hydra.searchpath` of your own all see
them."""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class VQ4DiTSettings(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from vq4dit.cli.settings_configs import register_settings

        for element in search_path.get_path():
            path = element.path or ""
            if "://" not in path or path.startswith("file://"):  # a folder (pkg:// and structured:// are not)
                folder = Path(path.removeprefix("file://"))
                if folder.is_dir():
                    register_settings(folder)
