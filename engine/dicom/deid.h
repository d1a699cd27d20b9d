/* DICOM de-identification: DICOM PS3.15 Annex E, the Basic Application
 * Level Confidentiality Profile with the Retain Patient Characteristics
 * Option (sex, age, size and weight only), for the image storage SOP
 * classes an AI endpoint reads (CT, MR, CR, DX, MG, PET, NM), behind a
 * plain C API.
 *
 * What happens to an instance (docs/conformance.md has the table)
 *   Refused (RR_DICOM_EREFUSED, nothing written): Burned In Annotation
 *   (0028,0301) YES, or a SOP class outside the list above.
 *   Replaced: every UID that is not a DICOM-defined one (root
 *   1.2.840.10008) and not a coding scheme or SOP class UID, at any depth,
 *   by "2.25." followed by the decimal of the first 128 bits of
 *   HMAC-SHA256(secret, uid) (rr_dicom_deid_uid); Patient ID and Accession
 *   Number by rr_dicom_deid_text pseudonyms ("patient_id", "accession").
 *   So the same secret gives the same pseudonyms for every instance, study
 *   and retry, and the secret holder can re-identify through the map the
 *   engine keeps.
 *   Emptied (Type 2 attributes of the image IODs): Patient's Name, Birth
 *   Date, Study Date and Time, Content Date and Time, Referring
 *   Physician's Name, Study ID, Contrast/Bolus Agent.
 *   Removed: every other attribute of Annex E's table for these IODs
 *   (other patient IDs and names, addresses, institution, department,
 *   station, physicians, operators, descriptions, protocol name, comments,
 *   device serial numbers and IDs, request and procedure step attributes,
 *   referenced study/patient/procedure step sequences, original and
 *   modified attributes, digital signatures, icon images); and, whatever
 *   the tag, every private element, overlay (60xx) and curve (50xx)
 *   group, and every element of VR PN, DA, DT, TM, LT, ST, UT or UN not
 *   emptied above.
 *   Kept: everything else, notably pixel data (byte for byte, in the
 *   transfer syntax it came in), pixel module, geometry (Image Position
 *   and Orientation, Pixel Spacing, Slice Thickness, Frame of Reference
 *   through its pseudonym), acquisition parameters (kVp, exposure, kernel,
 *   MR sequence parameters), Modality, Body Part Examined, Manufacturer and
 *   model, Series and Instance Number, Patient's Sex, Size, Weight and Age
 *   (an age over 89 years becomes 090Y).
 *   Set: Patient Identity Removed (0012,0062) YES, De-identification
 *   Method (0012,0063), De-identification Method Code Sequence (0012,0064)
 *   with (113100, DCM, "Basic Application Confidentiality Profile") and
 *   (113108, DCM, "Retain Patient Characteristics Option"), Longitudinal
 *   Temporal Information Modified (0028,0303) REMOVED; a new file meta
 *   header.
 *
 * Threading: blocking file I/O, worker threads; reentrant. Every entry
 *   point catches C++ exceptions. Nothing is logged (values are patient
 *   data).
 */
#ifndef RR_DICOM_DEID_H
#define RR_DICOM_DEID_H

#include <stddef.h>

#include "dicom/scp.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The instance must not leave de-identified: burned-in annotation, or a
 * SOP class the profile here does not cover. */
#define RR_DICOM_EREFUSED (RR_DICOM_EBASE - 20)

#define RR_DICOM_DEID_UID_MAX 65 /* a UID and its NUL */

/* rr_dicom_deid_uid: the pseudonym of uid under secret (len bytes):
 * "2.25." + the decimal of the first 16 bytes of HMAC-SHA256(secret, uid),
 * read as a big-endian unsigned integer (at most 44 characters). uid is
 * taken without trailing spaces or NULs. RR_EINVAL (empty uid or secret).
 * Pure; any thread. */
int rr_dicom_deid_uid(const void *secret, size_t len, const char *uid,
                      char out[RR_DICOM_DEID_UID_MAX]);

/* rr_dicom_deid_text: the pseudonym of an identifier of kind ("accession",
 * "patient_id"): "RR" + the first 7 bytes of HMAC-SHA256(secret, kind ":"
 * value) in upper-case hex (16 characters, fits SH). "" for an empty
 * value. cap >= 17, else RR_EINVAL. Pure; any thread. */
int rr_dicom_deid_text(const void *secret, size_t len, const char *kind, const char *value,
                       char *out, size_t cap);

/* Called once per UID replaced in an instance (original, pseudonym;
 * borrowed for the call), duplicates included. */
typedef void (*rr_dicom_deid_uid_fn)(void *ud, const char *original, const char *pseudonym);

typedef struct rr_dicom_deid_info {
  /* The instance, before and after. */
  char study_uid[RR_DICOM_DEID_UID_MAX], series_uid[RR_DICOM_DEID_UID_MAX],
      sop_uid[RR_DICOM_DEID_UID_MAX];
  char pseudo_study_uid[RR_DICOM_DEID_UID_MAX], pseudo_series_uid[RR_DICOM_DEID_UID_MAX],
      pseudo_sop_uid[RR_DICOM_DEID_UID_MAX];
  char modality[17];
  unsigned removed; /* elements removed or emptied (private ones included) */
  char why[200];    /* on failure or refusal: a sentence (no patient data) */
} rr_dicom_deid_info_t;

/* rr_dicom_deid_file: reads the DICOM file in_path, de-identifies it as
 * above and writes it to out_path (through "<out_path>.tmp" and a rename;
 * not fsync'ed: a copy that can be made again). uid_cb (may be NULL) sees
 * every UID replaced. info (required) is filled in. Errors, with a
 * sentence in info->why: RR_DICOM_EREFUSED (nothing written), RR_EPARSE
 * (not a DICOM file, or no SOP Instance UID), RR_EINVAL (no secret),
 * RR_DICOM_EDCMTK / -errno (cannot write), RR_ENOMEM. Worker threads. */
int rr_dicom_deid_file(const char *in_path, const char *out_path, const void *secret, size_t len,
                       rr_dicom_deid_uid_fn uid_cb, void *ud, rr_dicom_deid_info_t *info);

#ifdef __cplusplus
}
#endif

#endif
