# Variable reassignment (data/reassign/prepare.py) on a laptop CPU in about a minute: the model and
# tokens per step of config/shakespeare_char_cpu.py (3 layers, 128 wide, 1,024 tokens), with a context
# of 128 that always holds at least one whole 65-character line. A minute teaches the format of the
# lines, not the lookups: answers stay near chance (10%) this early.
#   python data/reassign/prepare.py && python train.py config/reassign_cpu.py
out_dir = "out-reassign-cpu"
dataset = "reassign"
device = "cpu"           # small enough that a GPU or MPS would spend the time starting up
n_layer = 3
n_head = 4
n_embd = 128
block_size = 128
batch_size = 8
dropout = 0.0
max_iters = 900
learning_rate = 2e-3     # small models take a larger step
min_lr = 2e-4
warmup_iters = 50
beta2 = 0.99
eval_interval = 300
eval_iters = 40
log_interval = 50
