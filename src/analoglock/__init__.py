"""analoglock: find how a frozen transformer relates its own features, and lock analogies.

Modules, one concern each: `model` (load the frozen model), `hooks` (hook names), `data`
(shipped datasets, corpus), `positions` (which tokens), `activations` (harvesting, stores),
`generation` (decoding with hooks).
"""

__version__ = "0.1.0"
