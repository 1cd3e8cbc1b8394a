#!/bin/bash
# Equal-schedule diagnostics for issue 12: +camera at full's 598 steps and full at +camera's 1039 steps (seed 0),
# run between two ablation rows (never two trainings at once), then the ablation resumes.
cd /work/wt-exp && . /work/main/.venv/bin/activate
log=/work/main/runs/diag4/queue.log
n0=$(wc -l < runs/ablation/results.jsonl)
echo "[$(date +%T)] waiting for the current ablation row (records: $n0)" >> $log
while [ "$(wc -l < runs/ablation/results.jsonl)" -le "$n0" ]; do sleep 15; done
pkill -f "python -m amfor.ablate"; sleep 2
for pid in $(pgrep -f "python -m amfor.train"); do kill -- -$(ps -o pgid= -p $pid | tr -d ' ') 2>/dev/null; done
sleep 5
echo "[$(date +%T)] ablation stopped after $(wc -l < runs/ablation/results.jsonl) records" >> $log
CAM="model.kwargs.amff=false model.kwargs.text=false model.kwargs.parts=false model.kwargs.teacher_student=false model.kwargs.amgd=false model.kwargs.hpr=false model.kwargs.part_recon=false model.kwargs.camera_centering=true"
FULL="model.kwargs.amff=true model.kwargs.text=true model.kwargs.parts=true model.kwargs.teacher_student=true model.kwargs.amgd=true model.kwargs.hpr=true model.kwargs.part_recon=true model.kwargs.camera_centering=true"
for job in "camera-598|$CAM|598" "full-1039|$FULL|1039"; do
  IFS='|' read -r name sets steps <<< "$job"
  [ -f runs/diag4/$name/results.json ] && continue
  echo "[$(date +%T)] start $name" >> $log
  python -m amfor.train --set $sets train.seed=0 train.max_steps=$steps train.max_minutes=0 --output runs/diag4/$name > runs/diag4/$name.log 2>&1 || echo "[$(date +%T)] $name FAILED" >> $log
  echo "[$(date +%T)] end $name" >> $log
done
echo "[$(date +%T)] resuming the ablation" >> $log
nohup python -m amfor.ablate --report docs/ablation.md >> /work/main/runs/ablation-round4.log 2>&1 &
