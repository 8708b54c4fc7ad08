"""Many adapters of one base compressed jointly: shared bases per module, a small core per adapter."""
