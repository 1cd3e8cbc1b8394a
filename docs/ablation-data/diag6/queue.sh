#!/bin/bash
# sequential diagnostics from /work/wt-exp; each line of queue.txt: name overrides...
cd /work/wt-exp3 && . /work/main/.venv/bin/activate
FULL="model.kwargs.amff=true model.kwargs.text=true model.kwargs.parts=true model.kwargs.teacher_student=true model.kwargs.amgd=true model.kwargs.hpr=true model.kwargs.part_recon=true model.kwargs.camera_centering=true train.max_minutes=0"
while true; do
  line=$(grep -v '^#' /work/main/runs/diag6/queue.txt | while read -r name rest; do [ -n "$name" ] && [ ! -f runs/diag6/$name/results.json ] && echo "$name $rest" && break; done)
  [ -z "$line" ] && break
  name=${line%% *}; rest=${line#* }
  echo "$(date +%H:%M:%S) start $name ($(git rev-parse --short HEAD)): $rest" >> runs/diag6/queue.log
  rm -rf runs/diag6/$name
  python -m amfor.train --set $FULL $rest --output runs/diag6/$name > runs/diag6/$name.out 2>&1
  echo "$(date +%H:%M:%S) end $name rc=$?" >> runs/diag6/queue.log
done
echo "$(date +%H:%M:%S) queue empty" >> runs/diag6/queue.log
