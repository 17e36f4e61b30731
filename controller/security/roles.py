"""Admin roles: which requests on the admin socket each role may make.

``admin`` may do everything; ``operator`` runs the fleet (drain, labels, power, catalog,
workflows, every job, profiles) and reads everything; ``submitter`` is an application: it
runs jobs and reads and cancels its own, and reads workflow definitions to know what it can
run; ``viewer`` reads everything and changes nothing. Every request the admin socket serves
must appear below (a test checks), so a new request cannot be left open by omission.
"""

from __future__ import annotations

from common.protocol.codec import ops_served_by

READ_OPS = frozenset({
    "list_nodes", "get_node", "get_status", "get_power_budget", "list_events", "list_executors", "list_workflows",
    "get_workflow", "list_components", "get_plan", "get_profile_run", "list_profiles", "list_jobs", "get_job",
})
OPERATE_OPS = frozenset({
    "drain_node", "undrain_node", "label_node", "set_node_power_limit", "unpin_power_limit", "set_power_budget",
    "apply_catalog", "apply_workflow", "delete_workflow", "submit_job", "cancel_job", "start_profile",
})
ADMIN_ONLY_OPS = frozenset({"inject_device_fault"})  # drills on (simulated) devices disturb live work
SUBMIT_OPS = frozenset({"submit_job", "get_job", "list_jobs", "cancel_job", "list_workflows", "get_workflow"})
# A submitter sees and cancels only the jobs it submitted; the workload service filters by owner.
OWN_JOBS_ONLY = frozenset({"get_job", "list_jobs", "cancel_job"})

ALLOWED_OPS: dict[str, frozenset[str]] = {
    "admin": READ_OPS | OPERATE_OPS | ADMIN_ONLY_OPS,
    "operator": READ_OPS | OPERATE_OPS,
    "submitter": SUBMIT_OPS,
    "viewer": READ_OPS,
}


def roles_allowed(op: str) -> list[str]:
    return [role for role, ops in ALLOWED_OPS.items() if op in ops]


def refusal(role: str, op: str) -> str | None:
    """None when ``role`` may make request ``op``; else a message naming the roles that may."""
    if op in ALLOWED_OPS.get(role, frozenset()):
        return None
    allowed = roles_allowed(op)
    if not allowed:  # not an admin request at all: the dispatcher answers unsupported_op
        return None
    needs = " or ".join(allowed)
    return f"{op} needs role {needs}; this key has role {role}"


def unclassified_ops() -> set[str]:
    """Admin requests no role list mentions (should be empty)."""
    return ops_served_by("controller.admin") - (READ_OPS | OPERATE_OPS | ADMIN_ONLY_OPS)
