"""Surgery on module trees: one module per lever (heads, feed_forward, kv_fold, lowrank, precision), plus selection and masking."""
