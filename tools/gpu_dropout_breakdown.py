"""Cost breakdown of the dropout scheme on raw FlexAttention (static shapes), H100-sized causal case:
the plain causal kernel, every block partial, + loads of the hash words, + the per-entry hash (the kept
pass), and the log-sum-exp pass. Usage on a CUDA machine: ``python tools/gpu_dropout_breakdown.py``."""
import torch
from triton.testing import do_bench
from torch.nn.attention.flex_attention import flex_attention, create_block_mask, BlockMask
from flexflash import dropout
B,H,N,D=4,16,4096,128
dev='cuda'
q,k,v=(torch.randn(B,H,N,D,device=dev,dtype=torch.bfloat16,requires_grad=True) for _ in range(3))
do=torch.randn_like(q)
causal=lambda b,h,i,j: j<=i
bm=create_block_mask(causal,None,None,N,N,device=dev)
# every visited block (the causal lower triangle of blocks) as a partial block
nb=N//128
dense=torch.ones(nb,nb,dtype=torch.bool,device=dev).tril()[None,None]
num=dense.sum(-1,dtype=torch.int32); idx=torch.argsort(dense.to(torch.int8),dim=-1,descending=True,stable=True).to(torch.int32)
params=dropout.draw_seed(0.1,dev)
bh=torch.arange(B*H*N,device=dev,dtype=torch.int32)
r1,r2=dropout.row_words(params,1,bh//N,torch.zeros_like(bh),bh%N); r1=r1.view(B,H,N); r2=r2.view(B,H,N)
c=dropout.column_word(params,torch.arange(N,device=dev,dtype=torch.int32)); thr=params[3]
def hashmask(b,h,i,j): return (j<=i) & dropout.entry_keep(r1[b,h,i],r2[b,h,i],c[j],thr)
def loadonly(b,h,i,j): return (j<=i) & ((r1[b,h,i] ^ c[j]) != 12345)
def mk(fn): return BlockMask.from_kv_blocks(num,idx,None,None,BLOCK_SIZE=128,mask_mod=fn,seq_lengths=(N,N))
variants={'causal normal':bm,'causal all-partial':mk(causal),'all-partial+loads':mk(loadonly),'all-partial+hash':mk(hashmask)}
res=[]
for name,m in variants.items():
    f=torch.compile(lambda q,k,v,m=m: flex_attention(q,k,v,block_mask=m))
    fw=lambda: f(q,k,v)
    fb=lambda: f(q,k,v).backward(do)
    fw(); fb(); torch.cuda.synchronize()
    a=do_bench(fw,warmup=20,rep=100,return_mode='median'); b_=do_bench(fb,warmup=10,rep=60,return_mode='median')
    print(f'{name:22} fwd {a:.3f} fwd+bwd {b_:.3f}', flush=True)
vz=torch.zeros(B,H,N,16,device=dev,dtype=torch.bfloat16)
from torch.nn.attention.flex_attention import AuxRequest
f=torch.compile(lambda q,k: flex_attention(q,k,vz,block_mask=bm,return_aux=AuxRequest(lse=True)))
print('lse-only fwd', do_bench(lambda: f(q,k), warmup=20, rep=100, return_mode='median'))
