"""amiflow's extensions to the moto server (see docs/EMULATOR.md for what each one fixes).

Each module exposes ``apply()``, which patches moto in this process; modules with time-driven state
(instance refresh) may also expose ``start_background()`` / ``stop_background()``. Import order
matters only in that every patch must be applied before the server handles its first request.
"""

import importlib

# Modules are added here as they are written; each must define apply().
MODULES = [
    "amiflow_shim.faults",
    "amiflow_shim.speed",
    "amiflow_shim.ec2",
    "amiflow_shim.events",
    "amiflow_shim.autoscaling",
    "amiflow_shim.cloudformation",
    "amiflow_shim.cloudformation_deploy",
    "amiflow_shim.ssm",
    "amiflow_shim.logs",
    # Last, so it wraps the app outermost and counts what every other module serves.
    "amiflow_shim.calls",
]

_applied = False


def _modules():
    found = []
    for name in MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
    return found


def apply():
    global _applied
    if _applied:
        return
    for module in _modules():
        module.apply()
    _applied = True


def wrap_app(app):
    """Let modules with control endpoints (``/amiflow-emulator/...``) wrap the WSGI app."""
    for module in _modules():
        if hasattr(module, "wrap_app"):
            app = module.wrap_app(app)
    return app


def start_background(app=None):
    for module in _modules():
        if hasattr(module, "start_background"):
            module.start_background()


def stop_background():
    for module in _modules():
        if hasattr(module, "stop_background"):
            module.stop_background()
