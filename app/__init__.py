"""h2o-serve: the HTTP server around h2o_cache."""
