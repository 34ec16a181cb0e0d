"""moe_tf behind other libraries' models (each module imports its library lazily)."""
