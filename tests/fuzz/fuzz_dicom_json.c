/* libFuzzer target for what a PACS answers to QIDO-RS and metadata
 * requests (DICOM JSON, PS3.18 F.2) and the Part 10 meta header WADO-RS
 * parts are named by. The datasets a parse accepts must be readable through
 * every accessor; a parse must not depend on the limit beyond the limit. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dicomweb/client.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint32_t tags[] = {0x0020000D, 0x0020000E, 0x00080018, 0x00100010, 0x00100020,
                                0x00080050, 0x00080060, 0x00080061, 0x00200011, 0x00201208};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  rr_dicomweb_result_t *r = NULL;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  int rc = rr_dicomweb_parse_datasets((const char *)data, size, 0, &r, &err);
  if (rc == 0) {
    if (!r)
      abort();
    for (size_t i = 0; i < r->n; i++) {
      const rr_dicomweb_match_t *m = &r->matches[i];
      const char *fields[] = {m->study_uid,  m->series_uid,   m->sop_instance_uid,
                              m->patient_id, m->patient_name, m->accession_number,
                              m->modality,   m->modalities};
      for (size_t k = 0; k < sizeof fields / sizeof fields[0]; k++)
        if (fields[k] && strlen(fields[k]) > size)
          abort();
      for (size_t t = 0; t < sizeof tags / sizeof tags[0]; t++) {
        double v;
        for (size_t n = 0; n < 3; n++) {
          const char *s = rr_dicomweb_json_string(m->json, tags[t], n);
          if (s && strlen(s) > size)
            abort();
          rr_dicomweb_json_number(m->json, tags[t], n, &v);
        }
      }
    }
    /* With a limit of one dataset: the same first dataset, or RR_ELIMIT. */
    rr_dicomweb_result_t *one = NULL;
    int rc1 = rr_dicomweb_parse_datasets((const char *)data, size, 1, &one, NULL);
    if (r->n <= 1 ? rc1 != 0 : rc1 != RR_ELIMIT)
      abort();
    rr_dicomweb_result_free(one);
  } else if (r) {
    abort();
  }
  rr_dicomweb_result_free(r);
  rr_buf_close(&err);
  char uid[65];
  rc = rr_dicomweb_part10_sop_uid(data, size, uid, sizeof uid);
  if (rc == 0 && strspn(uid, "0123456789.") != strlen(uid))
    abort();
  return 0;
}
