"""The logical axis names of the model's activations (params name theirs
where they are created: ``("embed", "q_heads")``, ...).

Activations have names of their own (``activation_*``), distinct from the
params', so ``qtrain.parallel.rules`` can split a weight's model width over
``fsdp`` while activations of that width stay whole, and split the residual
stream along the sequence (sequence parallelism) while attention sees it whole.
"""

# The residual stream [B, T, D] between blocks and around the norms.
RESIDUAL = ("activation_batch", "activation_norm_length", "activation_embed")
# Per-head activations [B, T, N|K, H]: queries, keys, values, attention output.
HEADS = {"q": ("activation_batch", "activation_length", "activation_heads", None),
         "kv": ("activation_batch", "activation_length", "activation_kv_heads", None)}
# The MLP hidden [B, T, F] (gate * up, the down projection's input).
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")
# Logits [B, T, V].
LOGITS = ("activation_batch", "activation_length", "activation_vocab")
