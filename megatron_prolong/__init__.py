"""megatron-prolong: ProLong-style long-context training of Llama-3 on megatron-core."""
from megatron_prolong.expected_warnings import filter_expected_warnings

filter_expected_warnings()  # before any megatron-core import: see expected_warnings.py
