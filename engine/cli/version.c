#include <curl/curl.h>
#include <jansson.h>
#include <lua.h>
#include <openssl/crypto.h>
#include <sqlite3.h>
#include <stdio.h>
#include <uv.h>

#include "cli/cli.h"
#include "dicom/dicom.h"

#ifndef RR_VERSION
#define RR_VERSION "0.1.0"
#endif

int rr_cmd_version(int argc, char **argv) {
  (void)argc;
  (void)argv;
  printf("radrelay %s\n", RR_VERSION);
  printf("libuv %s\n", uv_version_string());
  printf("openssl %s\n", OpenSSL_version(OPENSSL_VERSION_STRING));
  printf("jansson %s\n", jansson_version_str());
  printf("lua %s\n", LUA_RELEASE);
  printf("sqlite %s\n", sqlite3_libversion());
  printf("curl %s\n", curl_version_info(CURLVERSION_NOW)->version);
  printf("dcmtk %s\n", rr_dicom_version());
  return 0;
}
