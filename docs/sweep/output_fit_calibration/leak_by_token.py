"""Measurement only (see ../output_fit_calibration.md, section 8): where the probability the new tokens take
where they do not come goes, token by token, on the saved hidden states of hidden_states.py. Per token, the sum
over the positions where it is not the next token of its probability under the extended model (about the nats
it costs the other tokens there, log(1 + sum b) ~ sum p); for the run's rows and the rows moved by -1 nat.

    python leak_by_token.py RUN_DIR STATES.pt      # from the directory of the run
"""
import json, sys, torch
from safetensors.torch import load_file
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import direction
torch.set_num_threads(1)
run=sys.argv[1]; D=torch.load(sys.argv[2])
H=torch.cat(D["H"]).double(); nxt=torch.cat(D["nxt"]); new_ids=D["new_ids"]; norig=D["norig"]
W=load_file(f"{run}/model.safetensors")["lm_head.weight"].double()
d=direction(H.float()).double()
toks=json.load(open(f"{run}/report.json"))["tokens"]
for s in (0.0,-1.0):
    O=W[new_ids]+s*d
    leak=torch.zeros(len(new_ids),dtype=torch.float64); atw=torch.zeros(len(new_ids),dtype=torch.float64); uses=torch.zeros(len(new_ids))
    for i in range(0,len(H),2048):
        h,n=H[i:i+2048],nxt[i:i+2048]
        logz=torch.logsumexp(h@W[:norig].T,-1,keepdim=True)
        lb=h@O.T-logz
        lZ=torch.log1p(lb.exp().sum(-1,keepdim=True))
        p=(lb-lZ).exp()
        isw=(n[:,None]-norig)==torch.arange(len(new_ids))[None,:]
        leak+=(p*(~isw)).sum(0)   # ~ nats each token costs elsewhere (log(1+sum b) ~ sum p)
        atw+=(-(lb-lZ)*isw).sum(0); uses+=isw.sum(0)
    o=leak.sort(descending=True).values
    print(f"shift {s}: leak total {float(leak.sum()):.0f} nats; top 10% tokens {float(o[:50].sum()/o.sum()):.2f}, top 25% {float(o[:125].sum()/o.sum()):.2f}; tokens used in docs {int((uses>0).sum())}; leak by unused tokens {float(leak[uses==0].sum()):.0f}; at-word nats {float(atw.sum()):.0f} over {int(uses.sum())} uses")
    top=leak.argsort(descending=True)[:12]
    print("  top:", [(toks[j]["token"], round(float(leak[j]),1), int(uses[j])) for j in top])
