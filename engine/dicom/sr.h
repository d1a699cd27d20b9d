/* DICOM SR writer and reader: AI findings as a Comprehensive 3D SR
 * (1.2.840.10008.5.1.4.1.1.88.34) whose root is DCMR TID 1500 "Measurement
 * Report", behind a plain C API.
 *
 * Document
 *   Patient and study attributes (Patient's Name, Patient ID, Birth Date,
 *   Sex, Study Instance UID, Study Date/Time, Accession Number, Referring
 *   Physician's Name, Study ID, Study Description) are copied from one
 *   instance of the source study (read up to Pixel Data). The SR is a new
 *   series (Modality SR) in that study. Content tree:
 *
 *   CONTAINER (126000, DCM, "Imaging Measurement Report")   TID 1500
 *     HAS CONCEPT MOD  CODE (121049, DCM, "Language of Content Item and
 *                      Descendants") = (en-US, RFC5646, "English (United States)")
 *     HAS OBS CONTEXT  TID 1002/1004 device observer: Observer Type = Device,
 *                      Device Observer UID, Name, Manufacturer, Model Name
 *     HAS CONCEPT MOD  CODE (121058, DCM, "Procedure reported") = procedure
 *     CONTAINS CONTAINER (111028, DCM, "Image Library")     TID 1600
 *       CONTAINS CONTAINER (126200, DCM, "Image Library Group")
 *         CONTAINS IMAGE  one per referenced instance
 *     CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")
 *       CONTAINS CONTAINER (125007, DCM, "Measurement Group") per finding,
 *                      TID 1410 when it has a region, TID 1501 otherwise
 *         HAS OBS CONTEXT TEXT   (112039, DCM, "Tracking Identifier")
 *         HAS OBS CONTEXT UIDREF (112040, DCM, "Tracking Unique Identifier")
 *         HAS CONCEPT MOD CODE   (121071, DCM, "Finding")
 *         CONTAINS SCOORD   (111030, DCM, "Image Region")
 *                           SELECTED FROM IMAGE (instance [+ frame])
 *           or SCOORD3D     (111030, DCM, "Image Region") with its frame of
 *                           reference
 *         CONTAINS NUM      each measurement (UCUM units)
 *         CONTAINS NUM      (111012, DCM, "Certainty of Finding"), 0..1,
 *                           unit ("1", UCUM, "no units"), when given
 *         CONTAINS CODE     each qualitative evaluation (e.g. a category
 *                           or a critical-result flag the caller codes)
 *
 *   Current Requested Procedure Evidence Sequence lists every referenced
 *   instance. Contributing Equipment Sequence (0018,A001) has one item for
 *   the algorithm: Manufacturer, Manufacturer's Model Name (algorithm name),
 *   Software Versions (algorithm version), Device UID and Purpose of
 *   Reference (default (109103, DCM, "Modifying Equipment"), CID 7005).
 *   New UIDs are 2.25 UUID-derived. Completion Flag PARTIAL, Verification
 *   Flag UNVERIFIED (an algorithm does not verify).
 *
 * Output
 *   Written as a DICOM file (explicit VR little endian) to
 *   "<out_path>.rr-tmp.<pid>", fsync'ed, renamed to out_path and the
 *   directory fsync'ed; nothing is left at out_path on failure.
 *
 * Threading
 *   Blocking file I/O: worker threads only. Functions are reentrant; no
 *   callbacks. Every entry point catches C++ exceptions.
 *
 * Logging
 *   Counts and sizes at info; UIDs only at debug; never patient data.
 */
#ifndef RR_DICOM_SR_H
#define RR_DICOM_SR_H

#include <stddef.h>

#include "dicom/scp.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A coded concept. Strings borrowed; all three required where a code is
 * given (scheme designator e.g. "DCM", "SCT", "RADLEX", "UCUM"). */
typedef struct rr_dicom_code {
  const char *scheme;
  const char *value;
  const char *meaning;
} rr_dicom_code_t;

typedef enum rr_dicom_sr_shape {
  RR_DICOM_SR_NONE = 0, /* no region */
  RR_DICOM_SR_POINT,    /* 2D: 1 point (column,row); 3D: 1 point (x,y,z) */
  RR_DICOM_SR_POLYLINE, /* 2D: >= 2 points; closed when first == last */
  RR_DICOM_SR_ELLIPSE   /* 2D: 4 points, major axis end points then minor */
} rr_dicom_sr_shape_t;

/* Where a finding is. 2D: image coordinates (sub-pixel, top left pixel
 * centre = 0.5,0.5) on one referenced instance (and frame, 1-based; 0 = not
 * a multi-frame reference). 3D: patient coordinates in mm in
 * frame_of_reference_uid (only POINT). Borrowed. */
typedef struct rr_dicom_sr_region {
  rr_dicom_sr_shape_t shape;
  int is_3d;
  const double *coords; /* 2 (2D) or 3 (3D) values per point */
  size_t n_points;
  const char *sop_class_uid, *sop_instance_uid; /* 2D: the image */
  unsigned frame;                               /* 2D: 0 = none */
  const char *frame_of_reference_uid;           /* 3D */
} rr_dicom_sr_region_t;

typedef struct rr_dicom_sr_measurement {
  rr_dicom_code_t name; /* e.g. (410668003, SCT, "Length") */
  double value;
  const char *unit;         /* UCUM code, e.g. "mm", "mm3", "[hnsf'U]" */
  const char *unit_meaning; /* NULL: the code itself */
} rr_dicom_sr_measurement_t;

/* A qualitative evaluation: concept name and coded value. */
typedef struct rr_dicom_sr_evaluation {
  rr_dicom_code_t name;
  rr_dicom_code_t value;
} rr_dicom_sr_evaluation_t;

typedef struct rr_dicom_sr_finding {
  rr_dicom_code_t finding;  /* what was found (121071 "Finding") */
  const char *tracking_id;  /* label, 1..64 characters */
  const char *tracking_uid; /* NULL: a new UID (the reader fills it) */
  double confidence;        /* 0..1; negative = none */
  rr_dicom_sr_region_t region;
  const rr_dicom_sr_measurement_t *measurements;
  size_t n_measurements;
  const rr_dicom_sr_evaluation_t *evaluations;
  size_t n_evaluations;
} rr_dicom_sr_finding_t;

/* One referenced series of the source study and its instances. */
typedef struct rr_dicom_sr_series_ref {
  const char *series_instance_uid;
  const char *const *sop_class_uids; /* parallel arrays, n_instances each */
  const char *const *sop_instance_uids;
  size_t n_instances;
} rr_dicom_sr_series_ref_t;

/* The algorithm that produced the findings (observer context and
 * Contributing Equipment). */
typedef struct rr_dicom_sr_device {
  const char *name;                            /* algorithm name; required */
  const char *version;                         /* algorithm version; required */
  const char *manufacturer;                    /* required */
  const char *model_name;                      /* NULL: name */
  const char *device_uid;                      /* required, a valid UID */
  const rr_dicom_code_t *purpose_of_reference; /* NULL: (109103, DCM,
                                                  "Modifying Equipment") */
} rr_dicom_sr_device_t;

/* Everything the writer needs. Borrowed for the call. */
typedef struct rr_dicom_sr_input {
  const char *source_path; /* one instance of the source study; required */
  const rr_dicom_sr_series_ref_t *series;
  size_t n_series; /* >= 1 instance overall */
  rr_dicom_sr_device_t device;
  rr_dicom_code_t procedure; /* the imaging procedure reported; required */
  const rr_dicom_sr_finding_t *findings;
  size_t n_findings;
  const char *sop_instance_uid;    /* NULL: new (given: the same document written again) */
  const char *series_instance_uid; /* NULL: new */
  const char *series_description;  /* NULL: "AI Results" */
  int series_number;               /* <= 0: 900 */
  int instance_number;             /* <= 0: 1 */
  const char *manufacturer;        /* of the SR's creator; NULL: "radrelay" */
  const char *out_path;            /* required */
} rr_dicom_sr_input_t;

/* Filled with the new UIDs on success. */
typedef struct rr_dicom_sr_result {
  char sop_instance_uid[65];
  char series_instance_uid[65];
} rr_dicom_sr_result_t;

/* Why a call failed: a static or formatted reason, never patient data. */
typedef struct rr_dicom_sr_error {
  char text[256];
} rr_dicom_sr_error_t;

/* rr_dicom_sr_write: builds the SR of in and writes it to in->out_path
 * (durably, atomically). out (may be NULL) gets the new UIDs; err (may be
 * NULL) says why on failure.
 * Errors: RR_EINVAL (a missing or invalid field: see err), RR_ENOTFOUND
 * (source_path unreadable or not DICOM), RR_DICOM_EDCMTK (DCMTK refused the
 * document), negative errno from write/fsync/rename, RR_ENOMEM,
 * RR_DICOM_EINTERNAL. Any thread; blocking. */
int rr_dicom_sr_write(const rr_dicom_sr_input_t *in, rr_dicom_sr_result_t *out,
                      rr_dicom_sr_error_t *err);

/* rr_dicom_sr_new_uid: a new UID (2.25 and a random UUID, PS3.5 B.2), for
 * an SR whose UID is needed before it is written. 0, or a negative errno. */
int rr_dicom_sr_new_uid(char out[65]);

/* What rr_dicom_sr_read_summary found. Every string and array is owned by
 * the summary (valid until rr_dicom_sr_summary_free) and never NULL ("" when
 * absent); the const pointers of the nested structs point into it. */
typedef struct rr_dicom_sr_summary {
  const char *sop_class_uid, *sop_instance_uid;
  const char *study_instance_uid, *series_instance_uid;
  const char *template_id;     /* root template, "1500" */
  rr_dicom_code_t title;       /* root concept name */
  rr_dicom_code_t procedure;   /* "" members when absent */
  rr_dicom_sr_device_t device; /* observer context + Contributing Equipment;
                                  purpose_of_reference NULL when absent */
  rr_dicom_sr_finding_t *findings;
  size_t n_findings;
  size_t n_evidence_instances; /* Current Requested Procedure Evidence */
  size_t n_library_images;     /* IMAGE items in the Image Library */
} rr_dicom_sr_summary_t;

/* rr_dicom_sr_read_summary: reads an SR file written by rr_dicom_sr_write
 * (or any TID 1500 document with the same structure) back into findings.
 * The document is read by DCMTK with its IOD relationship constraints
 * checked; it must be a valid document tree with a TID 1500 root. *out is
 * new, owned by the caller: free it with rr_dicom_sr_summary_free.
 * Errors: RR_ENOTFOUND (unreadable or not DICOM), RR_EPARSE (not an SR
 * DCMTK accepts, or not TID 1500: see err), RR_ENOMEM, RR_DICOM_EINTERNAL.
 * Any thread; blocking. */
int rr_dicom_sr_read_summary(const char *path, rr_dicom_sr_summary_t **out,
                             rr_dicom_sr_error_t *err);

/* rr_dicom_sr_summary_free: frees a summary; NULL is a no-op. */
void rr_dicom_sr_summary_free(rr_dicom_sr_summary_t *s);

#ifdef __cplusplus
}
#endif

#endif
