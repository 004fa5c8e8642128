# Variable reassignment (data/reassign/prepare.py): the baby GPT's shape on generated programs whose
# copies keep their value while the source is reassigned. On one H200, 16 runs 10 at a time took 8 minutes.
#   python data/reassign/prepare.py && python train.py config/reassign.py --residual=add
out_dir = "out-reassign"
dataset = "reassign"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256         # lines are 65 characters: every window holds two or three whole ones
batch_size = 64
dropout = 0.0            # 3000 steps of 16,384 tokens see each of the 750k training lines about once
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
max_iters = 3000
eval_interval = 250
eval_iters = 50          # 819k validation tokens, about 39k answers whose line is whole in the window
log_interval = 50
