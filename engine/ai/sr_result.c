/* The DICOM SR of an AI result (dicom/sr.h, TID 1500): the result's model
 * as the device, its findings with their locations and measurements, the
 * study's instances (as received by a DICOM source) as the evidence. */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ai/ai.h"
#include "core/error.h"
#include "dicom/sr.h"

typedef struct inst {
  char *series, *sop_class, *sop;
} inst_t;

typedef struct instances {
  inst_t *v;
  size_t n;
  char *source; /* one local file of the study */
} instances_t;

static void instances_free(instances_t *in) {
  for (size_t i = 0; i < in->n; i++) {
    free(in->v[i].series);
    free(in->v[i].sop_class);
    free(in->v[i].sop);
  }
  free(in->v);
  free(in->source);
}

/* The study's instances received as files (DICOM sources), by series. */
static int load_instances(rr_journal_t *j, const char *study_uid, instances_t *out) {
  memset(out, 0, sizeof *out);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT series_uid, sop_class_uid, sop_instance_uid, path FROM instances"
                         " WHERE study_uid = ? AND substr(path, 1, 1) = '/'"
                         " ORDER BY series_uid, CAST(instance_number AS INTEGER)",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_TRANSIENT);
  size_t cap = 0;
  int rc = 0, s;
  while ((s = sqlite3_step(st)) == SQLITE_ROW) {
    if (out->n == cap) {
      size_t nc = cap ? cap * 2 : 64;
      inst_t *v = realloc(out->v, nc * sizeof *v);
      if (!v) {
        rc = RR_ENOMEM;
        break;
      }
      out->v = v;
      cap = nc;
    }
    inst_t *x = &out->v[out->n];
    x->series = strdup((const char *)sqlite3_column_text(st, 0));
    x->sop_class = strdup((const char *)sqlite3_column_text(st, 1));
    x->sop = strdup((const char *)sqlite3_column_text(st, 2));
    out->n++;
    if (!out->source)
      out->source = strdup((const char *)sqlite3_column_text(st, 3));
    if (!x->series || !x->sop_class || !x->sop || !out->source) {
      rc = RR_ENOMEM;
      break;
    }
  }
  if (rc == 0 && s != SQLITE_DONE)
    rc = RR_EIO;
  sqlite3_finalize(st);
  if (rc == 0 && out->n == 0)
    rc = RR_ENOTFOUND;
  return rc;
}

static rr_dicom_code_t code_of(json_t *c) {
  rr_dicom_code_t k = {json_string_value(json_object_get(c, "system")),
                       json_string_value(json_object_get(c, "code")),
                       json_string_value(json_object_get(c, "meaning"))};
  return k;
}

static const char *sop_class_of(const instances_t *in, const char *sop) {
  for (size_t i = 0; sop && i < in->n; i++)
    if (strcmp(in->v[i].sop, sop) == 0)
      return in->v[i].sop_class;
  return NULL;
}

struct rr_ai_sr_prep {
  instances_t in;
};

int rr_ai_sr_prepare(rr_journal_t *j, const char *study_uid, rr_ai_sr_prep_t **out) {
  rr_ai_sr_prep_t *p = calloc(1, sizeof *p);
  if (!p)
    return RR_ENOMEM;
  int rc = load_instances(j, study_uid, &p->in);
  if (rc) {
    rr_ai_sr_prep_free(p);
    return rc;
  }
  *out = p;
  return 0;
}

void rr_ai_sr_prep_free(rr_ai_sr_prep_t *p) {
  if (!p)
    return;
  instances_free(&p->in);
  free(p);
}

int rr_ai_write_sr(rr_journal_t *j, const rr_ai_result_t *r, json_t *study, const char *out_path,
                   char sop_uid[65], rr_buf_t *err) {
  const char *uid = json_string_value(json_object_get(study, "study_uid"));
  if (!uid || !r->nfindings)
    return RR_EINVAL;
  rr_ai_sr_prep_t *p;
  int rc = rr_ai_sr_prepare(j, uid, &p);
  if (rc)
    return rc;
  rc = rr_ai_sr_build(p, r, study, out_path, sop_uid, err);
  rr_ai_sr_prep_free(p);
  return rc;
}

int rr_ai_sr_build(const rr_ai_sr_prep_t *p, const rr_ai_result_t *r, json_t *study,
                   const char *out_path, char sop_uid[65], rr_buf_t *err) {
  const char *uid = json_string_value(json_object_get(study, "study_uid"));
  json_t *model = json_object_get(r->json, "model");
  if (!uid || !r->nfindings)
    return RR_EINVAL;
  int rc = 0;
  const instances_t in = p->in;
  /* Evidence: every instance, grouped by series. */
  size_t nser = 0;
  for (size_t i = 0; i < in.n; i++)
    nser += i == 0 || strcmp(in.v[i].series, in.v[i - 1].series) != 0;
  rr_dicom_sr_series_ref_t *ser = calloc(nser, sizeof *ser);
  const char **classes = calloc(in.n, sizeof *classes), **sops = calloc(in.n, sizeof *sops);
  rr_dicom_sr_finding_t *f = calloc(r->nfindings, sizeof *f);
  rr_dicom_sr_measurement_t *ms = NULL;
  double *coords = calloc(r->nfindings * 3, sizeof *coords);
  size_t nms = 0;
  for (size_t i = 0; i < r->nfindings; i++)
    nms += json_array_size(json_object_get(r->findings[i].json, "measurements"));
  if (nms)
    ms = calloc(nms, sizeof *ms);
  if (!ser || !classes || !sops || !f || !coords || (nms && !ms)) {
    rc = RR_ENOMEM;
    goto out;
  }
  size_t k = 0;
  for (size_t i = 0; i < in.n; i++) {
    if (i == 0 || strcmp(in.v[i].series, in.v[i - 1].series) != 0) {
      ser[k].series_instance_uid = in.v[i].series;
      ser[k].sop_class_uids = &classes[i];
      ser[k].sop_instance_uids = &sops[i];
      k++;
    }
    classes[i] = in.v[i].sop_class;
    sops[i] = in.v[i].sop;
    ser[k - 1].n_instances++;
  }
  size_t mi = 0;
  for (size_t i = 0; i < r->nfindings; i++) {
    const rr_ai_finding_t *rf = &r->findings[i];
    json_t *loc = json_object_get(rf->json, "location");
    f[i].finding = (rr_dicom_code_t){rf->code_system, rf->code, rf->meaning};
    f[i].tracking_id = rf->id;
    f[i].confidence = rf->confidence;
    json_t *p2 = json_object_get(loc, "point"), *p3 = json_object_get(loc, "point3d");
    const char *sop = json_string_value(json_object_get(loc, "instance_uid"));
    const char *sop_class = sop_class_of(&in, sop);
    if (json_array_size(p2) == 2 && sop_class) {
      coords[3 * i] = json_number_value(json_array_get(p2, 0));
      coords[3 * i + 1] = json_number_value(json_array_get(p2, 1));
      f[i].region = (rr_dicom_sr_region_t){
          .shape = RR_DICOM_SR_POINT,
          .coords = &coords[3 * i],
          .n_points = 1,
          .sop_class_uid = sop_class,
          .sop_instance_uid = sop,
          .frame = (unsigned)json_integer_value(json_object_get(loc, "frame"))};
    } else if (json_array_size(p3) == 3 &&
               json_string_value(json_object_get(loc, "frame_of_reference_uid"))) {
      for (int c = 0; c < 3; c++)
        coords[3 * i + c] = json_number_value(json_array_get(p3, (size_t)c));
      f[i].region = (rr_dicom_sr_region_t){.shape = RR_DICOM_SR_POINT,
                                           .is_3d = 1,
                                           .coords = &coords[3 * i],
                                           .n_points = 1,
                                           .frame_of_reference_uid = json_string_value(
                                               json_object_get(loc, "frame_of_reference_uid"))};
    }
    json_t *mj = json_object_get(rf->json, "measurements");
    f[i].measurements = ms ? &ms[mi] : NULL;
    for (size_t m = 0; m < json_array_size(mj); m++, mi++) {
      json_t *one = json_array_get(mj, m);
      ms[mi].name = code_of(json_object_get(one, "code"));
      ms[mi].value = json_number_value(json_object_get(one, "value"));
      ms[mi].unit = json_string_value(json_object_get(one, "unit"));
      f[i].n_measurements++;
    }
  }
  /* The procedure reported: the imaging procedure of the order. */
  json_t *proc = json_object_get(json_object_get(study, "order"), "procedure");
  const char *pcode = json_string_value(json_object_get(proc, "code"));
  const char *ptext = json_string_value(json_object_get(proc, "text"));
  const char *psys = json_string_value(json_object_get(proc, "system"));
  const char *desc = json_string_value(json_object_get(study, "description"));
  rr_dicom_sr_input_t si = {
      .source_path = in.source,
      .series = ser,
      .n_series = nser,
      .device = {.name = r->model_name,
                 .version = r->model_version,
                 .manufacturer = json_string_value(json_object_get(model, "manufacturer")),
                 .device_uid = json_string_value(json_object_get(model, "device_uid"))},
      .procedure =
          pcode ? (rr_dicom_code_t){psys && *psys ? psys : "L", pcode,
                                    ptext && *ptext ? ptext : pcode}
                : (rr_dicom_code_t){"99RADRELAY", "STUDY", desc && *desc ? desc : "Imaging study"},
      .findings = f,
      .n_findings = r->nfindings,
      .sop_instance_uid = sop_uid[0] ? sop_uid : NULL,
      .out_path = out_path};
  if (!si.device.manufacturer)
    si.device.manufacturer = "unknown";
  rr_dicom_sr_result_t res;
  rr_dicom_sr_error_t e;
  rc = rr_dicom_sr_write(&si, &res, &e);
  if (rc == 0)
    snprintf(sop_uid, 65, "%s", res.sop_instance_uid);
  else if (err)
    rr_buf_printf(err, "%s", e.text);
out:
  free(ser);
  free(classes);
  free(sops);
  free(f);
  free(ms);
  free(coords);
  return rc;
}
