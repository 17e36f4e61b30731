"""Workflows, tasks, executor catalogs and the value types that flow between stages."""
