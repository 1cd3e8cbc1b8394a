"""Small helpers with no dependency beyond the standard library and torch (importable on a bare GPU machine)."""
