"""Engine-agnostic steering math: request schema, per-step plans, the hook."""
