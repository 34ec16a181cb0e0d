"""The fixed ids of the special tokens every vocabulary of this project starts with.

The models read them (padding masks, decoding); the tokenizer (`train.data.tokenizer`)
learns its vocabulary around them.
"""

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
