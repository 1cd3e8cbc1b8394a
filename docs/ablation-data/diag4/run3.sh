#!/bin/bash
# Seed 1 of the equal-schedule 2 x 2, between ablation rows (one training at a time): full s1 (ablation row, 598),
# camera-598 s1 (diag), +camera s1 (ablation row, 1039), full-1039 s1 (diag); then the whole ablation resumes.
cd /work/wt-exp && . /work/main/.venv/bin/activate
log=/work/main/runs/diag4/queue.log
n0=$(wc -l < runs/ablation/results.jsonl)
echo "[$(date +%T)] run3: waiting for the current ablation row (records: $n0)" >> $log
while [ "$(wc -l < runs/ablation/results.jsonl)" -le "$n0" ]; do sleep 15; done
pkill -f "python -m amfor.ablate"; sleep 2
for pid in $(pgrep -f "python -m amfor.train"); do kill -- -$(ps -o pgid= -p $pid | tr -d ' ') 2>/dev/null; done
sleep 5
CAM="model.kwargs.amff=false model.kwargs.text=false model.kwargs.parts=false model.kwargs.teacher_student=false model.kwargs.amgd=false model.kwargs.hpr=false model.kwargs.part_recon=false model.kwargs.camera_centering=true"
FULL="model.kwargs.amff=true model.kwargs.text=true model.kwargs.parts=true model.kwargs.teacher_student=true model.kwargs.amgd=true model.kwargs.hpr=true model.kwargs.part_recon=true model.kwargs.camera_centering=true"
diag() {  # name, switches, steps
  [ -f runs/diag4/$1-s1/results.json ] && return
  echo "[$(date +%T)] start $1-s1" >> $log
  python -m amfor.train --set $2 train.seed=1 train.max_steps=$3 train.max_minutes=0 --output runs/diag4/$1-s1 > runs/diag4/$1-s1.log 2>&1 || echo "[$(date +%T)] $1-s1 FAILED" >> $log
  echo "[$(date +%T)] end $1-s1" >> $log
}
echo "[$(date +%T)] ablation row full s1" >> $log; python -m amfor.ablate --only full --seeds 2 >> /work/main/runs/ablation-round4.log 2>&1
diag camera-598 "$CAM" 598
echo "[$(date +%T)] ablation row +camera s1" >> $log; python -m amfor.ablate --only +camera --seeds 2 >> /work/main/runs/ablation-round4.log 2>&1
diag full-1039 "$FULL" 1039
echo "[$(date +%T)] resuming the ablation" >> $log
nohup python -m amfor.ablate --report docs/ablation.md >> /work/main/runs/ablation-round4.log 2>&1 &
