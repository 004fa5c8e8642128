# The baby GPT on character-level Shakespeare: 6 layers, 6 heads, 384 wide, context 256 (10.6M params).
# Start from nanoGPT's recipe (5000 iterations, lr 1e-3 -> 1e-4, dropout 0.2, beta2 0.99), retuned:
# this backbone learns faster and overfits within ~1000 steps, so the run is shorter and the cosine
# anneals while validation loss is still falling. See the README for the measurements behind it.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
batch_size = 64
dropout = 0.2            # on attention weights and on every write into the residual state
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99             # a little larger than usual: few tokens per step
warmup_iters = 100
max_iters = 1000
eval_interval = 250
eval_iters = 100
log_interval = 10
