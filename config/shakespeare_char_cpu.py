# A character-level Shakespeare model that a laptop CPU trains in about a minute.
out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
device = "cpu"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
dropout = 0.0
max_iters = 1000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
beta2 = 0.99
eval_interval = 250
eval_iters = 20
log_interval = 50
