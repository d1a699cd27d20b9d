/* radrelay DICOM layer: a plain C interface over DCMTK (C++ inside).
 * Every entry point catches C++ exceptions and returns an error code. */
#ifndef RR_DICOM_H
#define RR_DICOM_H

#ifdef __cplusplus
extern "C" {
#endif

/* rr_dicom_version: DCMTK's version string (static). Any thread. */
const char *rr_dicom_version(void);

#ifdef __cplusplus
}
#endif

#endif
