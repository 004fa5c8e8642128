# A small GPT-2-token model on a folder of books: your own text, or the 36 public-domain books of
# the README's example (about 5.5M training tokens). One GPU trains it in a few minutes.
#   python data/prepare.py --input=PATH_TO_FOLDER_OF_TXT --name=books --tokenizer=gpt2
out_dir = "out-books"
dataset = "books"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 512
batch_size = 32          # 16,384 tokens per step
dropout = 0.1            # 1000 steps see the corpus about three times
learning_rate = 1e-3     # the paper's peak learning rate
min_lr = 1e-4
warmup_iters = 100
max_iters = 1000
eval_interval = 250
eval_iters = 40
log_interval = 50
