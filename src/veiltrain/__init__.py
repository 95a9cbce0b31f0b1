"""veiltrain: train on secret shares, reconstruct only on the owner."""

from veiltrain import compat as _compat

# CrypTen 0.4.1 does not import on current torch; patch it whenever it gets imported.
_compat.install()
