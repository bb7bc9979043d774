#!/bin/bash
# Submit a job-array scoring run and its merge in one go; prints "ARRAY_JOB MERGE_JOB".
#
#   MODEL=m.h5 INPUT='docs/*.jsonl' OUTPUT=/scores/s.jsonl slurm/submit-array.sh 8 [more sbatch options]
#
# MAX_PARALLEL=K runs at most K tasks at a time (--array=0-(N-1)%K).
# The N array tasks each score a block of the documents; the merge job runs only if every task
# succeeded (afterok), and is cancelled otherwise (--kill-on-invalid-dep), so a gap is never merged.
set -euo pipefail
n=${1:?usage: MODEL=... INPUT=... OUTPUT=... slurm/submit-array.sh TASKS [sbatch options]}
shift
: "${MODEL:?is required}" "${INPUT:?is required}" "${OUTPUT:?is required}"
here=$(cd "$(dirname "$0")" && pwd)
array=$(sbatch --parsable --array=0-$((n - 1))${MAX_PARALLEL:+%$MAX_PARALLEL} --export=ALL "$@" "$here/score-array.sbatch")
array=${array%%;*}
merge=$(sbatch --parsable --dependency=afterok:"$array" --kill-on-invalid-dep=yes --export=ALL,PARTS="$n" \
  --output="${OUTPUT}.merge-%j.out" "$here/merge.sbatch")
echo "${array} ${merge%%;*}"
