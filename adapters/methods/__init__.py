"""One file per method; importing this package registers them all."""

from adapters.methods import eata, eata_c, norm, source, tent

__all__ = ["eata", "eata_c", "norm", "source", "tent"]
