"""Checkpoint I/O, one place for every reader and writer in flora_mm: safe loading
(``safe_load``), plain values (``plain``), atomic files and resumable checkpoints (``files``),
fit checks (``fit``) and the random state (``rng``). It sits below every other floor of the
package (it knows tensors and files, not PEFT methods or models)."""
from .dcp import (check_dcp_checkpoint, dcp_to_file, dcp_unreadable_reason, is_dcp_checkpoint,
                  load_dcp_checkpoint, load_dcp_into, write_dcp_checkpoint)
from .files import (ATOMIC_BACKEND, AtomicLocalBackend, add_companions, commit_companions,
                    discard_companions,
                    find_resumable_checkpoint, point_last_checkpoint, remove_stale_temporaries,
                    unreadable_reason)
from .fit import (check_finite, check_keys, check_types, describe_changes, non_finite_tensors,
                  shape_mismatches, state_dict_of)
from .plain import CKPT_KEY, plain_checkpoint, restore_message_hub, to_plain
from .rng import rng_state, set_rng_state
from .safe_load import (CheckpointError, UnsafeCheckpointError, load_checkpoint_file,
                        load_checkpoint_meta, load_tensor_file, mmengine_checkpoint_globals,
                        mmengine_safe_globals,
                        safe_load_from_local)

__all__ = [
    'ATOMIC_BACKEND', 'AtomicLocalBackend', 'add_companions', 'commit_companions',
    'discard_companions', 'dcp_unreadable_reason', 'is_dcp_checkpoint', 'load_dcp_checkpoint',
    'write_dcp_checkpoint', 'check_dcp_checkpoint', 'dcp_to_file', 'load_dcp_into',
    'load_checkpoint_meta',
    'find_resumable_checkpoint', 'point_last_checkpoint', 'remove_stale_temporaries',
    'unreadable_reason', 'check_finite', 'check_keys', 'check_types', 'describe_changes',
    'non_finite_tensors', 'shape_mismatches', 'state_dict_of', 'CKPT_KEY', 'plain_checkpoint',
    'restore_message_hub', 'to_plain', 'rng_state', 'set_rng_state', 'CheckpointError',
    'UnsafeCheckpointError', 'load_checkpoint_file', 'load_tensor_file',
    'mmengine_checkpoint_globals', 'mmengine_safe_globals', 'safe_load_from_local',
]
