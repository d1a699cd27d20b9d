/* The scripts' AI store (ai.findings, ai.verdict) over ai/verdict.h: what
 * a script records commits with the batch of the message it handles. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "ai/verdict.h"
#include "channel/channel_int.h"
#include "core/error.h"

static int findings(void *ud, const char *accession, const char *study_uid, rr_buf_t *out) {
  rr_channel_t *ch = ud;
  json_t *list;
  int rc = rr_ai_findings_json(ch->engine->journal, accession, study_uid, &list);
  if (rc)
    return rc;
  char *text = json_dumps(list, JSON_COMPACT);
  json_decref(list);
  rc = text ? rr_buf_puts(out, text) : RR_ENOMEM;
  free(text);
  return rc;
}

static int verdict(void *ud, const rr_script_ai_verdict_t *v, const char **outcome, rr_buf_t *err) {
  rr_channel_t *ch = ud;
  rr_ai_verdict_t av = {.job_id = v->job_id,
                        .finding_id = v->finding_id,
                        .verdict = v->verdict,
                        .by = v->by,
                        .note = v->note,
                        .report = v->report,
                        .channel = ch->cfg.name,
                        .at_ms = rr_wall_ms()};
  rr_ai_verdict_outcome_t o;
  int rc = rr_ai_verdict_record(ch->engine->journal, &av, &o, err);
  if (rc == 0)
    *outcome = rr_ai_verdict_outcome_name(o);
  return rc;
}

rr_script_ai_t rr_channel_script_ai(rr_channel_t *ch) {
  return (rr_script_ai_t){.ud = ch, .findings = findings, .verdict = verdict};
}
