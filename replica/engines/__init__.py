"""Engines: the forward pass behind a batcher. `torch_engine` runs real models; `simulated`
replaces the forward pass with a timing profile. Both speak the protocols in `engines.base`."""
