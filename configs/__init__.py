"""ml_collections configs, one `get_config(arg)` file per stage."""
