"""First-look timing of fastbn against PyTorch CPU on (32, 64, 56, 56) float32, 2 threads.

Four input buffers are rotated so inputs are not cache-resident; each line is the median
of 21 calls. "fastbn" allocates its output like torch does; "out=" writes a preallocated
buffer; GB/s counts the ideal traffic (2 passes forward, 3 backward, 1 for moments) of
the out= call. The fuller side-by-side (bandwidth measured in the same run, JSON, plot)
is the performance issue's benchmarks/compare.py.

Run: python benchmarks/first_look.py   (needs torch)
"""
import time

import numpy as np
import torch

import fastbn as fbn

torch.set_num_threads(2); fbn.set_num_threads(2)
rng=np.random.default_rng(0)
shape=(32,64,56,56); NB=4; R=21
def bench(f):
    ts=[]
    for i in range(R):
        t=time.perf_counter(); f(i); ts.append(time.perf_counter()-t)
    return np.median(ts)*1e3
nbytes=np.prod(shape)*4
for axis in (1,-1):
    xs=[rng.normal(size=shape).astype(np.float32) for _ in range(NB)]
    if axis==-1: xs=[np.ascontiguousarray(x.transpose(0,2,3,1)) for x in xs]
    dys=[rng.normal(size=xs[0].shape).astype(np.float32) for _ in range(NB)]
    outs=[np.empty_like(xs[0]) for _ in range(NB)]
    C=64; w=np.ones(C,np.float32); b=np.zeros(C,np.float32); rm=np.zeros(C,np.float32); rv=np.ones(C,np.float32)
    mean,inv=fbn.batch_norm_forward(xs[0],axis=axis)[1:]
    if axis==1: txs=[torch.from_numpy(x) for x in xs]; tdys=[torch.from_numpy(d) for d in dys]
    else: txs=[torch.from_numpy(x).permute(0,3,1,2) for x in xs]; tdys=[torch.from_numpy(d).permute(0,3,1,2) for d in dys]
    tw=torch.ones(C); tb=torch.zeros(C); trm=torch.zeros(C); trv=torch.ones(C); tm=torch.from_numpy(mean); ti=torch.from_numpy(inv)
    rows=[("training forward", lambda i: fbn.batch_norm(xs[i%NB],rm,rv,w,b,training=True,axis=axis),
                               lambda i: fbn.batch_norm(xs[i%NB],rm,rv,w,b,training=True,axis=axis,out=outs[i%NB]),
                               lambda i: torch.nn.functional.batch_norm(txs[i%NB],trm,trv,tw,tb,training=True), 2),
          ("inference", lambda i: fbn.batch_norm(xs[i%NB],rm,rv,w,b,axis=axis),
                        lambda i: fbn.batch_norm(xs[i%NB],rm,rv,w,b,axis=axis,out=outs[i%NB]),
                        lambda i: torch.nn.functional.batch_norm(txs[i%NB],trm,trv,tw,tb,training=False), 2),
          ("backward", lambda i: fbn.batch_norm_backward(dys[i%NB],xs[i%NB],mean,inv,w,axis=axis),
                       lambda i: fbn.batch_norm_backward(dys[i%NB],xs[i%NB],mean,inv,w,axis=axis,out=outs[i%NB]),
                       lambda i: torch.ops.aten.native_batch_norm_backward(tdys[i%NB],txs[i%NB],tw,trm,trv,tm,ti,True,1e-5,[True,True,True]), 3),
          ("moments", lambda i: fbn.moments(xs[i%NB],axis=axis), None, lambda i: torch.var_mean(txs[i%NB],dim=(0,2,3),correction=0), 1)]
    for name,f1,f2,ft,passes in rows:
        a=bench(f1); bo=bench(f2) if f2 else float('nan'); t=bench(ft)
        print(f"{'NCHW' if axis==1 else 'NHWC'} {name:17s} fastbn {a:6.2f} ms (out= {bo:6.2f} ms, {passes*nbytes/bo/1e6 if f2 else passes*nbytes/a/1e6:5.1f} GB/s)  torch {t:6.2f} ms  speed-up {t/a:4.2f}x")
