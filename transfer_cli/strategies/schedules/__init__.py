"""Layer schedules: what trains when. `freeze` (a fixed set), chain-thaw, gradual and sequential
unfreezing; the frozen-feature cache they share lives here too."""
