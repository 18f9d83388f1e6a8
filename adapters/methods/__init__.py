"""One file per method; importing this package registers them all (adding a method is adding a file)."""

import importlib
import pkgutil

__all__ = sorted(info.name for info in pkgutil.iter_modules(__path__))
for _name in __all__:
    importlib.import_module(f"{__name__}.{_name}")
