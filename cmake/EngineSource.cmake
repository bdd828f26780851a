# The engine's source: the pinned stable-diffusion-cpp-python sdist, fetched by pip
# (the registry's ordinary client), checked against its sha256 and unpacked into
# sfumato's cache. Nothing of it is ever part of this repository.
#
# The unpacked tree lives at a fixed path in a cache (SFUMATO_BUILD_CACHE, default
# ~/.cache/sfumato/build), not in the build folder: ccache then finds its objects
# again from another checkout or a fresh clone, and no later build fetches it again.

set(SFUMATO_ENGINE_DISTRIBUTION "stable-diffusion-cpp-python")
set(SFUMATO_ENGINE_VERSION "0.4.7")
set(SFUMATO_ENGINE_SHA256 "998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282")

function(_sfumato_build_cache out)
    if(DEFINED ENV{SFUMATO_BUILD_CACHE} AND NOT "$ENV{SFUMATO_BUILD_CACHE}" STREQUAL "")
        set(root "$ENV{SFUMATO_BUILD_CACHE}")
    elseif(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
        set(root "$ENV{XDG_CACHE_HOME}/sfumato/build")
    elseif(DEFINED ENV{HOME})
        set(root "$ENV{HOME}/.cache/sfumato/build")
    else()
        set(root "${CMAKE_BINARY_DIR}/sfumato-build-cache")
    endif()
    set(${out} "${root}" PARENT_SCOPE)
endfunction()

# Fetch (or reuse) the sdist and set <out_var> to the folder it unpacked into.
# SFUMATO_ENGINE_SDIST may name a local copy of the same file (offline builds);
# it is checked against the same sha256.
function(sfumato_engine_source out_var)
    _sfumato_build_cache(cache)
    string(SUBSTRING "${SFUMATO_ENGINE_SHA256}" 0 12 short)
    set(stem "stable_diffusion_cpp_python-${SFUMATO_ENGINE_VERSION}")
    set(tree "${cache}/engine-source/${stem}-${short}")
    set(stamp "${tree}/.sfumato-sha256")

    if(EXISTS "${stamp}")
        file(READ "${stamp}" recorded)
        if(recorded STREQUAL SFUMATO_ENGINE_SHA256)
            message(STATUS "sfumato: engine source ${stem} from the cache (${tree})")
            set(${out_var} "${tree}/${stem}" PARENT_SCOPE)
            return()
        endif()
    endif()

    if(DEFINED ENV{SFUMATO_ENGINE_SDIST} AND NOT "$ENV{SFUMATO_ENGINE_SDIST}" STREQUAL "")
        set(archive "$ENV{SFUMATO_ENGINE_SDIST}")
        message(STATUS "sfumato: engine source from SFUMATO_ENGINE_SDIST=${archive}")
    else()
        if(NOT Python_EXECUTABLE)
            find_package(Python COMPONENTS Interpreter REQUIRED)
        endif()
        set(download "${CMAKE_BINARY_DIR}/engine-sdist")
        file(REMOVE_RECURSE "${download}")
        set(requirement "${CMAKE_BINARY_DIR}/engine-requirement.txt")
        file(WRITE "${requirement}"
            "${SFUMATO_ENGINE_DISTRIBUTION}==${SFUMATO_ENGINE_VERSION} --hash=sha256:${SFUMATO_ENGINE_SHA256}\n")
        message(STATUS "sfumato: pip download ${SFUMATO_ENGINE_DISTRIBUTION}==${SFUMATO_ENGINE_VERSION} (sdist)")
        # --no-build-isolation: pip reads the sdist's metadata with the scikit-build-core
        # that builds sfumato instead of installing another one for it.
        execute_process(
            COMMAND "${Python_EXECUTABLE}" -m pip download --no-deps --no-build-isolation
                    --no-binary "${SFUMATO_ENGINE_DISTRIBUTION}" --require-hashes
                    -r "${requirement}" -d "${download}"
            RESULT_VARIABLE status
        )
        if(NOT status EQUAL 0)
            message(FATAL_ERROR
                "sfumato: pip could not download ${SFUMATO_ENGINE_DISTRIBUTION}==${SFUMATO_ENGINE_VERSION}. "
                "Without the package index, set SFUMATO_ENGINE_SDIST to a local copy of ${stem}.tar.gz.")
        endif()
        set(archive "${download}/${stem}.tar.gz")
    endif()

    if(NOT EXISTS "${archive}")
        message(FATAL_ERROR "sfumato: ${archive} does not exist")
    endif()
    file(SHA256 "${archive}" got)
    if(NOT got STREQUAL SFUMATO_ENGINE_SHA256)
        message(FATAL_ERROR
            "sfumato: ${archive} has sha256 ${got}; ${stem}.tar.gz must have ${SFUMATO_ENGINE_SHA256}")
    endif()

    # Unpack beside the final place, then move it there, so that a build that stops
    # halfway never leaves a tree that looks complete.
    string(RANDOM LENGTH 8 nonce)
    set(partial "${tree}.partial-${nonce}")
    file(REMOVE_RECURSE "${partial}")
    file(ARCHIVE_EXTRACT INPUT "${archive}" DESTINATION "${partial}")
    file(WRITE "${partial}/.sfumato-sha256" "${SFUMATO_ENGINE_SHA256}")
    file(REMOVE_RECURSE "${tree}")
    file(RENAME "${partial}" "${tree}" RESULT moved)
    if(NOT moved EQUAL 0)
        # Another build unpacked the same tree meanwhile; use theirs.
        file(REMOVE_RECURSE "${partial}")
    endif()
    set(${out_var} "${tree}/${stem}" PARENT_SCOPE)
endfunction()
