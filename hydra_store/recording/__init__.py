"""Recording: `HydraRecorder` around any SGD training loop, and the built-in run behind
`hydra-store record` (`record_run`). Nothing below this layer trains; nothing in analysis or
replay imports it."""
