"""The controller: node registry, store, admin API and its daemon."""
