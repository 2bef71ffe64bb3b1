"""Everything about backends: calling them, admitting work to them, their load signals, local servers."""
