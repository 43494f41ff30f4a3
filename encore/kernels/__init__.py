"""Triton kernels of the worker and their torch twins (``kernels.reference``).

Modules, one public wrapper each (they check dtypes, shapes and strides, ValueError else):
``decode_attention``, ``prefill_attention``, ``kv_write``, ``rope`` (rope_qk,
rope_rerotate_blocks), ``block_copy`` (gather_blocks, scatter_blocks), ``rmsnorm``,
``activation`` (silu_mul).
Nothing is imported here: TRITON_INTERPRET must be decided before a kernel module loads.
"""
