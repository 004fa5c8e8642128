# A character-level Shakespeare model that a laptop CPU trains in about a minute: 3 layers, 128 wide,
# context 64 (0.6M parameters). On this backbone 3 layers reach a lower loss per second than 4, and
# 16 sequences per step use the CPU better than 12 (fewer, larger matrix products per token).
out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
device = "cpu"           # small enough that a GPU or MPS would spend the time starting up
n_layer = 3
n_head = 4
n_embd = 128
block_size = 64
batch_size = 16
dropout = 0.0            # 900 steps see each character about once: nothing to regularize yet
max_iters = 900
learning_rate = 2e-3     # small models take a larger step
min_lr = 2e-4
warmup_iters = 50
beta2 = 0.99
eval_interval = 450      # an evaluation costs about a second, and the last one scores best
eval_iters = 40          # 41k characters, a third of the validation text
log_interval = 50
