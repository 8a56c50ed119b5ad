"""hooked_ssm: TransformerLens-style hooked models for recurrent-state language models.

Gated DeltaNet hybrids (Qwen3.5, Qwen3-Next), Mamba-2 and RWKV-7 with a hook on every quantity of
the recurrence, including the rank-1 cache write (``blocks.{l}.mixer.hook_write``) and the state
(``blocks.{l}.mixer.hook_state``), under one vocabulary for all three families.
"""

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.hook_names import as_flat, as_matrix
from hooked_ssm.model import HookedSSM
from hooked_ssm.pretrained.checkpoint import CheckpointError
from hooked_ssm.state import RecurrentState

__all__ = ["HookedSSM", "HookedSSMConfig", "RecurrentState", "CheckpointError", "as_matrix", "as_flat"]
