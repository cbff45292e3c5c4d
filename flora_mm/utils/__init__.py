"""Small helpers shared by the package, the tools and the tests (one place per concern)."""
from .fileio import atomic_dir, atomic_paths
from .misc import config_dicts, short_list, tensor_bytes
from .scope import SCOPES, register_task_modules

__all__ = ['SCOPES', 'register_task_modules', 'atomic_paths', 'atomic_dir', 'config_dicts',
           'short_list', 'tensor_bytes']
